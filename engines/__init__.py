"""Engine kinds: what an engine is, how it is installed, checked and launched. No Ray here."""
