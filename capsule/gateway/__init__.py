"""
What sessions reach of capsule from inside: the session door (one port on
the host side of each session network), the egress proxy behind it, and the
credential gateway that puts real keys on a session's requests without the
keys ever entering its container.
"""
