"""The ecgtwin Flower ServerApp (runs on the coordinator's SuperLink)."""
