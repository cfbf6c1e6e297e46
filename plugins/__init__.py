"""milbench's built-in plugins (installed as ``milbench_plugins``).

Each module registers its method or dataset through the ``milbench`` entry
point group, exactly as a third-party package would.
"""
