"""The bottom layer: errors, the typed config, atomic files, devices and precision."""
