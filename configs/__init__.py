"""The run configs, installed as package data of ``lowrank_recipes.configs`` (found with ``importlib.resources``)."""
