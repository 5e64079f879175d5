"""Budget: what to send. The communication budget (budget.py), cost model, one-shot selection, fine-tuning
with distillation, and the data it trains on."""
