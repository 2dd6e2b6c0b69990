"""One exception type for bad user input, so CLIs can print one line and exit 2."""


class BlockDropError(Exception):
  """A problem with the user's input (file, config, shapes) that names the fix."""


EXIT_USAGE = 2
