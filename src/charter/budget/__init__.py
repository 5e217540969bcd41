"""Budgets: prices, an exact ledger (reserve -> settle -> release), periods."""
