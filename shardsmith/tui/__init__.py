"""`shardsmith plan`: the full-screen plan editor and the `--auto` command behind it.

Importing this package does not import Textual; `command.plan_command` loads the app only when a
screen is needed.
"""
