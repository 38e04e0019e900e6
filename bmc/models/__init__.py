"""Where models come from: the zoo, the trained reference model and the text it learned from."""
