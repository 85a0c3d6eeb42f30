"""Reading the input, checking it before anything is sent, and writing the output."""
