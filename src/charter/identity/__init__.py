"""Identity: keys, charters (certificates), invites, enrolment and the agent registry."""
