"""Notifiers: each sends one notification and says where it landed, so a resolve can edit it."""
