"""The ecgtwin Flower ClientApp (runs inside each hospital's SuperNode)."""
