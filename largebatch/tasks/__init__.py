"""Tasks: data + model + loss + metrics, built by name.

``get_task("mnist1d-cnn", num_samples=2000)`` builds a registered task;
``get_task("mypackage.tasks:cifar10")`` calls a user's function returning a
:class:`Task`. ``list_tasks()`` lists the registered ones with their options.
"""

from largebatch.tasks.base import Task, accuracy
from largebatch.tasks.registry import TaskSpec, get_spec, get_task, list_tasks

__all__ = ["Task", "TaskSpec", "accuracy", "get_spec", "get_task", "list_tasks"]
