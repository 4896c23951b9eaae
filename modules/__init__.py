"""Python reconstruction modules (installed from the repository's modules/ directory)."""
