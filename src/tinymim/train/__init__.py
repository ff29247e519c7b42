"""Training machinery: the loop every task shares, metric loggers, the k-NN monitor."""
