"""The method: relation maps and their KL, feature and class-token targets, MAE masking and decoder."""
