"""Local stand-ins for third-party gateways (FCM, Web Push, APNs, a webhook receiver), on loopback only."""
