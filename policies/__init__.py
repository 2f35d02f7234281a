"""Every choice a user can make, each a small named strategy behind a registry (``catalog`` loads them all)."""
