"""Generated from protos/ by `python -m online.protogen`; do not edit."""
