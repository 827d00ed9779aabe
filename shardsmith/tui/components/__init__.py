"""The widgets and screens of the plan editor, one a module."""
