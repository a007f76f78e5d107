"""LightningDataModules and the dataset code behind them."""
