"""The run-level error every layer may raise: one line that says what to change.

It lives in its own module so that methods, data, models and evaluators can raise it without
importing the trainer (arrows point downward: the trainer imports them, never the reverse).
`mim_jax.main` prints it as `error: <message>` and exits with code 2.
"""


class TrainingError(RuntimeError):
  """A run that cannot go on; the message says what to change."""
