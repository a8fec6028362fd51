"""Everything that makes or consumes data and weights: data, the training loop, data generation, evaluation, the
shapes world. It imports llava_plugin; llava_plugin never imports it."""
