"""One run's stages in order: calibrate -> score -> select -> apply -> evaluate -> record."""
