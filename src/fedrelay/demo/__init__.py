"""The federated pneumonia demo: model, data, metrics, Flower apps and a centralized Lightning run.

Kept in an importable package (not in example scripts) because Ray pickles functions from
``__main__`` by value into every task; code here is imported by reference in each actor.
"""
