"""The paper's rules, as pure functions of numbers: the learning-rate schedule (schedule.py), the effective
learning rate (optim.py), the batch plan (batch_plan.py), the compute budgets (budget.py) and the best-k-of-n
selection (selection.py). No torch at import time; imports only harness.core."""
