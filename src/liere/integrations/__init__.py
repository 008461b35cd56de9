"""Adapters for other model libraries; import each on its own (``liere.integrations.timm``)."""
