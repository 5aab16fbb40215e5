"""Lua scripts, one per atomic operation; loaded by dispatcher.scripts."""
