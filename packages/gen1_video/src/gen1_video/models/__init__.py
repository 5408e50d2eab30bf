"""Networks of Gen-1: the video UNet inflated from ldm's image UNet."""
