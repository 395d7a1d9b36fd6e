"""fedrelay-quickstart: a Flower app whose every round and client streams to a fedrelay relay."""
