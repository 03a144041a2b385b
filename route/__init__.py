"""The route stage."""
