"""Benchmarks behind ``fedbus bench``: real processes, real sockets, figures as a table and a JSON line."""
