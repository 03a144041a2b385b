Return-Path: <asa.lindqvist@partner.example>
Delivered-To: support@example.com
Received: from smtp.partner.example (smtp.partner.example [203.0.113.17])
	by mail.example.com with ESMTPS id 4XyPt91Wk3z9sYr
	for <support@example.com>; Tue, 26 Nov 2024 06:41:22 +0000
From: =?utf-8?q?=C3=85sa_Lindqvist?= <asa.lindqvist@partner.example>
To: support@example.com
Subject: Cannot log in to the partner portal since this morning
Date: Tue, 26 Nov 2024 07:41:19 +0100
Message-ID: <a41c9e5b-7d2f-4b8e-9c61-3f0e2d7a5b18@partner.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Hello,

Since about 07:00 this morning none of us at Lindqvist Logistik can log in
to the partner portal. The login page answers "Ogiltig session / invalid
session" right after the password, in Firefox and in Edge alike.

Our account number is P-30917. Could you look into it? We cannot book
pick-ups until it works again.

Med v=C3=A4nliga h=C3=A4lsningar / kind regards,
=C3=85sa Lindqvist
Lindqvist Logistik AB, G=C3=B6teborg
