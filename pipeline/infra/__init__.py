"""What any part may lean on, torch-free: atomic and durable writes, other processes, damaged SQLite files,
store URLs without their passwords, text from elsewhere, the host's memory budget."""

