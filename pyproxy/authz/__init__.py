"""Zero trust, part 2: AuthorizationPolicy (policy.py) and RequestAuthentication (jwt.py)."""
