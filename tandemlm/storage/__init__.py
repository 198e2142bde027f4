"""Files written safely: atomic writes and folders (temp name, then rename), and the guard that refuses pickle."""
