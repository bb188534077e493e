"""
capsule: browser terminals in fresh, isolated, resource-limited Docker containers.
"""

__version__ = "0.1.0"
