"""Test helpers shared by the test packages (import as `helpers.<module>`)."""
