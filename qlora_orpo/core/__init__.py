"""The floor every layer stands on: errors, durable file writes, the console, what the launcher says.

Imports nothing from the rest of the package.
"""
