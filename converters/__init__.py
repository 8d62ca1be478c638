"""zoo's built-in weight-source plugins (installed as `zoo.converters`); each module is one plugin."""
