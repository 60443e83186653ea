"""pastiche: turn a writer's body of work into a local model that writes in that voice."""

__version__ = "0.1.0"
