"""Node agent: device discovery, slice preparation, usage read back, and libvgpu."""
