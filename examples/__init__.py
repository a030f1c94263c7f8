"""Example programs: an external agent, a companion node, a chat channel."""
