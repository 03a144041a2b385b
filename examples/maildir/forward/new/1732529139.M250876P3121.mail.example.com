Return-Path: <bob@example.com>
Delivered-To: mailroute-forward@example.com
Received: from EX01.corp.example.com (10.20.0.11) by EX02.corp.example.com
 (10.20.0.12) with Microsoft SMTP Server (version=TLS1_2,
 cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id 15.2.1544.4; Mon, 25 Nov 2024 10:05:39 +0000
From: Bob Okafor <bob@example.com>
To: "mailroute-forward@example.com" <mailroute-forward@example.com>
Subject: FW: Price list 2025 (draft)
Thread-Topic: Price list 2025 (draft)
Date: Mon, 25 Nov 2024 10:05:39 +0000
Message-ID: <DB9PR10MB57318E20D6A4C1F3B9E05D72A1C48@DB9PR10MB5731.corp.example.com>
Accept-Language: en-US
Content-Language: en-US
X-MS-Has-Attach: yes
X-MS-Exchange-Organization-AutoForwarded: true
X-MS-Exchange-Inbox-Rules-Loop: bob@example.com
Content-Type: multipart/mixed; boundary="_002_DB9PR10MB57318E20D6A4C1F3B9E05D72A1C48_"
MIME-Version: 1.0

--_002_DB9PR10MB57318E20D6A4C1F3B9E05D72A1C48_
Content-Type: text/plain; charset="us-ascii"
Content-Transfer-Encoding: 7bit

This message was forwarded by a rule in Bob Okafor's mailbox.

--_002_DB9PR10MB57318E20D6A4C1F3B9E05D72A1C48_
Content-Type: message/rfc822
Content-Disposition: attachment;
	creation-date="Mon, 25 Nov 2024 10:05:39 GMT";
	modification-date="Mon, 25 Nov 2024 10:05:39 GMT"

Return-Path: <grace.lee@supplier.example>
Delivered-To: bob@example.com
Received: from mx1.supplier.example (mx1.supplier.example [192.0.2.25])
	by mail.example.com with ESMTPS id 4Xy6Gq1LzPz9sWd
	for <bob@example.com>; Mon, 25 Nov 2024 10:05:36 +0000
From: Grace Lee <grace.lee@supplier.example>
To: Bob Okafor <bob@example.com>
Subject: Price list 2025 (draft)
Date: Mon, 25 Nov 2024 11:05:33 +0100
Message-ID: <20241125100533.pl2025.glee@supplier.example>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="=_alt_5c1f0e7a9b"

--=_alt_5c1f0e7a9b
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit

Hi Bob,

Ahead of next year's framework agreement, here is the draft price list
for 2025. Prices change on 1 January; orders placed before then keep
the 2024 prices.

  DX-200 controller       389.00 -> 405.00 EUR
  IK-10 installation kit  240.00 -> 240.00 EUR
  SV-1 service visit      150.00 -> 165.00 EUR

Let me know if you want to go through it before the framework meeting.

Grace Lee
Sales, Fischer Components GmbH

--=_alt_5c1f0e7a9b
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<html><body style=3D"font-family: Arial, sans-serif;">
<p>Hi Bob,</p>
<p>Ahead of next year's framework agreement, here is the draft price list f=
or 2025.
Prices change on 1&nbsp;January; orders placed before then keep the 2024 pr=
ices.</p>
<table border=3D"1" cellpadding=3D"4" style=3D"border-collapse: collapse;">
<tr><th>Item</th><th>2024</th><th>2025</th></tr>
<tr><td>DX-200 controller</td><td align=3D"right">389.00&nbsp;EUR</td><td a=
lign=3D"right">405.00&nbsp;EUR</td></tr>
<tr><td>IK-10 installation kit</td><td align=3D"right">240.00&nbsp;EUR</td>=
<td align=3D"right">240.00&nbsp;EUR</td></tr>
<tr><td>SV-1 service visit</td><td align=3D"right">150.00&nbsp;EUR</td><td =
align=3D"right">165.00&nbsp;EUR</td></tr>
</table>
<p>Let me know if you want to go through it before the framework meeting.</=
p>
<p>Grace Lee<br>Sales, Fischer Components GmbH</p>
</body></html>

--=_alt_5c1f0e7a9b--

--_002_DB9PR10MB57318E20D6A4C1F3B9E05D72A1C48_--
