"""Mixed precision: plans (bits per layer), MSQ and HAWQ searches, Pareto reports."""
