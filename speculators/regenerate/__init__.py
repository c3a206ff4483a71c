"""`speculators regenerate`: assistant turns rewritten by the verifier (runner + backends)."""
