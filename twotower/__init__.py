"""The applications above ``offline`` and ``online``: the ``twotower`` CLI front and the demo."""
