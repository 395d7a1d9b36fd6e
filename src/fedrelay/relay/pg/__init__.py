"""The event log on PostgreSQL: several relay processes on one database form one relay."""
