"""A language-conditioned 2-D tabletop reaching task, rendered with numpy (a test fixture for policy quality)."""
