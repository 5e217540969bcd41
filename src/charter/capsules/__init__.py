"""Capsules: context documents such as AI_ALIGNMENT_LATEST, rebuilt from the live system."""
