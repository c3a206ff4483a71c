"""Streamlit dashboard: `streamlit run app/Home.py` (pages under app/pages)."""
