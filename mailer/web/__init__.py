"""The web app, built by `app.create_app`: the recipient pages (`public`), the console
(`admin`) and the API (`api`), faces over `mailer.operations`, sharing `runtime.Web`; the
security headers and CSRF (`security`) and the rate limits (`ratelimit`)."""
