"""Route modules; main.py mounts them."""
